"""What the docs site builds from the code (`make docs`): pages that must not drift from it."""
