"""Training from the command line: tokenizer (``var train-tokenizer``), VAR / raster AR and CoDe recipes
(``var train``), and the end-to-end digits demo (``var demo``).  Runs are resumable and self-contained."""
