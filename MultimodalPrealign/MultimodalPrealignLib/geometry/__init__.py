"""Pure helpers on physical (LPS mm) space: image extents and boxes (``image_space``), transforms, resampling,
foreground masks. They import nothing from the stages above them."""
