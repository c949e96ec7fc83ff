"""The serving API's request and response bodies as Pydantic models.

FastAPI validates each request against its route's model before the handler runs, serialises each answer
through the route's response model, and /docs (the OpenAPI schema at /openapi.json) shows both.

The request models carry the server's limits (ServeSettings: max_texts, max_chars, max_messages, max_tokens)
as schema constraints, so each app builds its own (`request_bodies`); the response models are fixed.
`refusal` turns the first of pydantic's errors into the server's one-line error: the status (413 for a size
limit passed, else 422), a message naming the field and the fix, and the limit's name.

(No `from __future__ import annotations` here: the request models are classes built in a function, whose
annotations name that function's locals.)
"""

from typing import Annotated, Any, Literal, NamedTuple, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, model_validator

from .inputs import text_problem

# --- errors ------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="the problem and the fix, in one line")
    type: str = Field(description="invalid_request_error, limit_exceeded, authentication_error, permission_error, "
                                  "not_found, overloaded, timeout, unavailable or internal_error")
    limit: Optional[str] = Field(None, description="the server setting the request passed (max_texts, max_chars, "
                                                   "max_body_bytes, ...), when a limit refused it")


class ErrorBody(BaseModel):
    """Every answer other than 2xx."""

    error: ErrorDetail


class Refusal(NamedTuple):
    """A request body the server refuses: the status, the message, the limit passed (if one was)."""

    status: int
    message: str
    limit: Optional[str] = None


# --- requests ----------------------------------------------------------------------------------------------

TEXTS_EXAMPLE = '{"texts": ["a text", ...]}'
MESSAGES_EXAMPLE = '[{"role": "user", "content": "..."}]'
ROLES = ("system", "user", "assistant")


def _clean(text: str) -> str:
    """`text` when every tokenizer can take it (a ValueError's message follows the field's name)."""
    problem = text_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty: send text to process")
    return _clean(text)


class TextPart(BaseModel):
    """An OpenAI content part: text parts only."""

    type: Literal["text"]
    text: str


def _joined(content: Any) -> Any:
    """OpenAI content parts as one string (text parts only); anything else is left to the string check."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ValueError('holds a part that is not text: only text parts are supported ({"type": "text", '
                         '"text": "..."})')
    return "".join(p["text"] for p in content)


class RequestBodies(NamedTuple):
    """One app's request models, built with its limits."""

    texts: type[BaseModel]  # /v1/classify, /v1/translate, /v1/ner
    chat: type[BaseModel]  # /v1/chat/completions
    explain: type[BaseModel]  # /v1/explain


def request_bodies(max_texts: int, max_chars: int, max_messages: int, max_tokens: int) -> RequestBodies:
    """The request models of a server with these limits (each shown in the schema, each checked by pydantic)."""
    return RequestBodies(_texts_request(max_texts, max_chars), _chat_request(max_chars, max_messages, max_tokens),
                         _explain_request(min(max_texts, EXPLAIN_MAX_TEXTS), max_chars))


EXPLAIN_MAX_TEXTS = 8  # an explanation costs ~steps forward and backward passes: a few texts a request


def _explain_request(max_texts: int, max_chars: int) -> type[BaseModel]:
    Text = Annotated[StrictStr, Field(max_length=max_chars), AfterValidator(_text)]

    class ExplainRequest(BaseModel):
        """Texts whose answers are explained word by word."""

        texts: Annotated[list[Text], Field(
            min_length=1, max_length=max_texts, examples=[["a warm, funny film"]],
            description=f"1 to {max_texts} texts, each of at most {max_chars} characters")]
        target: Optional[StrictStr] = Field(None, max_length=200, description=(
            "the class (or, for named entities, the entity's words) to attribute toward; default: the answer"))
        method: Literal["auto", "integrated-gradients", "occlusion"] = Field("auto", description=(
            "auto: Integrated Gradients where gradients reach the input, else occlusion (int8, ONNX)"))
        steps: int = Field(32, ge=2, le=256, strict=True, description="Integrated Gradients steps")

    return ExplainRequest


def _texts_request(max_texts: int, max_chars: int) -> type[BaseModel]:
    Text = Annotated[StrictStr, Field(max_length=max_chars), AfterValidator(_text)]

    class TextsRequest(BaseModel):
        """Texts for the served model, each answered in order."""

        texts: Annotated[list[Text], Field(
            min_length=1, max_length=max_texts, examples=[["a text", "another text"]],
            description=f"1 to {max_texts} texts (max_texts), each of at most {max_chars} characters (max_chars), "
                        "not blank, valid Unicode without NUL")]

    return TextsRequest


def _chat_request(max_chars: int, max_messages: int, token_limit: int) -> type[BaseModel]:
    Content = Annotated[StrictStr, BeforeValidator(_joined, json_schema_input_type=Union[str, list[TextPart]]),
                        Field(max_length=max_chars), AfterValidator(_clean)]
    Tokens = Annotated[Optional[int], Field(None, ge=1, le=token_limit, strict=True)]

    class ChatMessage(BaseModel):
        role: Literal[ROLES] = Field(description="system, user or assistant")
        content: Content = Field(description=f"a string, or OpenAI text parts; at most {max_chars} characters")

    class ChatRequest(BaseModel):
        """An OpenAI chat completion request (one choice; other OpenAI fields are accepted and ignored)."""

        messages: Annotated[list[ChatMessage], Field(
            min_length=1, max_length=max_messages,
            description=f"1 to {max_messages} messages (max_messages), the last one from the user")]
        model: Optional[str] = Field(None, description="ignored: the server serves one run")
        max_tokens: Tokens = Field(description=f"at most {token_limit} (the server's max_tokens); default: the "
                                               "run's chat.max_new_tokens")
        max_completion_tokens: Tokens = Field(description="the same as max_tokens (OpenAI's newer name)")
        temperature: Annotated[Optional[float], Field(None, ge=0, le=2, strict=True, description=(
            "0 to 2; left out: 0, the greedy answer (the same every time, as the run was evaluated), where "
            "OpenAI's own default is 1"))]
        top_p: Annotated[Optional[float], Field(None, gt=0, le=1, strict=True, description="above 0, at most 1")]
        n: Optional[Literal[1]] = Field(1, description="one choice per request")
        stream: Optional[bool] = Field(False, description="true: server-sent events of chat.completion.chunk")

        @model_validator(mode="after")
        def _asks(self) -> "ChatRequest":
            if self.messages[-1].role != "user":
                raise ValueError("the last message must come from the user: the model answers it")
            if not self.messages[-1].content.strip():
                raise ValueError("the last user message is empty: ask something")
            return self

    return ChatRequest


# --- responses ---------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    run: str = Field(description="the served run's id")
    task: str = Field(description="its task (a name of the task table)")
    route: str = Field(description="the route it answers on")
    artifact: str = Field(description="fp32, or the optimised artifact served")
    marked: bool = Field(description="the optimize report marks this artifact (slower, or less accurate)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: str
    artifact: str


class ModelList(BaseModel):
    """OpenAI's model list: the one run served."""

    object: Literal["list"]
    data: list[ModelCard]


class LabelResult(BaseModel):
    label: str = Field(description="the predicted label, or \"uncertain\" when the top probability is under the "
                                   "abstain threshold")
    scores: dict[str, float] = Field(description="each label's probability (calibrated when the run fitted a "
                                                 "temperature)")
    abstained: Optional[bool] = Field(default=None, description="true when the model abstained")
    top_label: Optional[str] = Field(default=None, description="the most probable label, when it abstained")


class ValueResult(BaseModel):
    value: float = Field(description="the predicted value (text regression)")


class ClassifyResponse(BaseModel):
    model: str = Field(description="the served run's id")
    artifact: str
    results: list[Union[LabelResult, ValueResult]] = Field(description="one per text, in order")


class TokenAttribution(BaseModel):
    token: str = Field(description="a word of the text as the model read it")
    start: int = Field(description="its first character in the text")
    end: int = Field(description="one past its last character")
    attribution: float = Field(description="its push toward the target (positive: toward)")
    by_class: dict[str, float] = Field(description="its push toward each class (or entity, or the value)")


class Explanation(BaseModel):
    model_config = ConfigDict(extra="allow")  # the answer's own fields: label and score, value, entities

    text: str
    target: Optional[str] = Field(None, description="what the attributions push toward")
    method: str = Field(description="integrated-gradients or occlusion")
    tokens: list[TokenAttribution] = Field(description="one per word, in order")


class ExplainResponse(BaseModel):
    model: str = Field(description="the served run's id")
    artifact: str
    results: list[Explanation] = Field(description="one per text, in order")


class TranslateResponse(BaseModel):
    model: str = Field(description="the served run's id")
    translations: list[str] = Field(description="one per text, in order")


class Entity(BaseModel):
    type: str = Field(description="the entity type (PER, LOC, ...)")
    start: int = Field(description="its first character in the text")
    end: int = Field(description="one past its last character")
    text: str = Field(description="text[start:end]")
    score: float = Field(description="the mean probability of its tokens' tags")


class TextEntities(BaseModel):
    text: str
    entities: list[Entity]


class NerResponse(BaseModel):
    model: str = Field(description="the served run's id")
    results: list[TextEntities] = Field(description="one per text, in order")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion (with `stream: true`: server-sent events of chat.completion.chunk instead)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# --- pydantic's errors as the server's --------------------------------------------------------------------

FIELD_RULES = {  # what a scalar field must hold, for any error on it
    "temperature": "must be a number from 0 to 2",
    "top_p": "must be a number above 0 and at most 1",
    "max_tokens": "must be a whole number >= 1",
    "max_completion_tokens": "must be a whole number >= 1",
    "stream": "must be true or false",
    "model": "must be a string",
}


def field_name(loc: list[Any]) -> str:
    """["texts", 1] -> "texts[1]"; ["messages", 0, "content"] -> "messages[0].content"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def refusal(error: dict[str, Any]) -> Refusal:
    """The server's answer to one pydantic error of a request body (FastAPI's locations start at "body")."""
    loc = list(error.get("loc", ()))[1:] if tuple(error.get("loc", ()))[:1] == ("body",) else list(error["loc"])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    name, last = field_name(loc), next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind in ("too_long", "string_too_long") and isinstance(value, str):
        return Refusal(413, f"{name} has {len(value)} characters, more than max_chars={ctx['max_length']}: "
                            "shorten it or split it", "max_chars")
    if kind == "too_long":
        return Refusal(413, f"{ctx['actual_length']} {last} is more than max_{last}={ctx['max_length']}: send at "
                            f"most {ctx['max_length']} per request", f"max_{last}")
    if kind == "less_than_equal" and last in ("max_tokens", "max_completion_tokens"):
        return Refusal(422, f"{last}={value} is more than the server's limit max_tokens={ctx['le']}: ask for "
                            "fewer", "max_tokens")
    if kind == "value_error":
        return Refusal(422, f"{name} {ctx['error']}" if name else str(ctx["error"]))
    if kind == "string_unicode" and isinstance(value, str):
        return Refusal(422, f"{name} {text_problem(value) or 'is not valid Unicode: send UTF-8 text'}")
    return Refusal(422, _shape_message(loc, name, last, kind, value, error.get("msg", "")))


def _shape_message(loc: list[Any], name: str, last: str, kind: str, value: Any, msg: str) -> str:
    """The message for a missing field or a value of the wrong type or range."""
    if not loc:
        return "the body is not a JSON object: send one, with the header Content-Type: application/json"
    if loc == ["texts"]:
        if kind == "missing":
            return f'field "texts" is missing: send {TEXTS_EXAMPLE}'
        return f'field "texts" must be a non-empty list of strings: {TEXTS_EXAMPLE}'
    if loc == ["messages"]:
        return f'field "messages" must be a non-empty list: {MESSAGES_EXAMPLE}'
    if loc[0] == "messages" and (len(loc) == 2 or last == "role"):
        return f"{field_name(loc[:2])} needs a role of {', '.join(ROLES[:-1])} or {ROLES[-1]}"
    if kind == "missing":
        return f'field "{name}" is missing'
    if kind == "string_type":
        return f"{name} is a {type(value).__name__}: {'every text' if last == 'texts' else 'it'} must be a string"
    if last == "n":
        return f"n={value!r}: this server returns one choice per request; send n=1"
    if last in FIELD_RULES:
        return f"{name} {FIELD_RULES[last]}, got {value!r}"
    return f"{name}: {msg}"
