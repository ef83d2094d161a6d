"""The built-in tasks, one module each: gan, vqvae (VAR's tokenizer), var, vlm; capabilities.py says what a trained
model of a task can do beyond training. The registry that finds a task by name is vistrain/registry.py."""
