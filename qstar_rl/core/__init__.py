"""Pure tensor math of Quiet-STaR. Imports torch only; distributed counts come in as arguments."""
