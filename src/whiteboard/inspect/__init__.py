"""Seeing what a recurrent network remembers: traces of gates and states over a text,
how far gradients reach back, and the HTML and PNG reports built from them."""
