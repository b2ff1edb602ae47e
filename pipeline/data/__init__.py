"""Images in. One image's path from file to training sample, a module per step:

``sources`` (list SRC, assign keys) -> ``augment`` (decode, validate, RGB, frozen augmentation; ``resize`` is the
reference's cv2 resize) -> ``png`` (deterministic PNG) -> ``shards`` (webdataset tar + sidecar, resume) ->
``ingest`` (the driver: Ray tasks, manifest, ``imageset.json``) -> ``imageset`` (the format and its reader); the
training side reads it through ``pipeline.train.stream``.

Beside it: ``config`` (IngestConfig), ``cli`` (``spar ingest``), ``datasets`` (benchmark readers, class lists).
"""
