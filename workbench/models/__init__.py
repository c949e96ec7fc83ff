"""The model layer: loading checkpoints, applying tuning methods (peft, bitsandbytes), prompting and label
scoring. It knows nothing of tasks, runs or the training loop (those import it, never the reverse)."""
