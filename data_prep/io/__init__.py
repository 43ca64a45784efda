"""Files in and out: LIDC-IDRI DICOM (index, series), LUNA16 MetaImage, atomic writers and a case's files."""
