"""Values that several floors of the package must agree on, defined once."""

IGNORE_INDEX = -100  # label of positions outside the loss (as Hugging Face)
