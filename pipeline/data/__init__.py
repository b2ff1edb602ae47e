"""Images in: ingest (files or URLs -> webdataset image sets), the image-set reader, the paired training stream,
benchmark datasets and class lists, and the reference resize."""
