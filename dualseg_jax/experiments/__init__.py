"""The paper's experiments as commands: ablations, the evaluation protocol, and their tables."""
