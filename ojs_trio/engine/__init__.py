"""Pure job rules (model, validation, state machine, retry math) and the Engine."""
