"""The catalogue refresh, the top of the layers: it needs `training` (train, embed), `index`
(build, publish) and the service's database and settings.

    train on the catalogue -> re-embed it -> build an index version -> guard -> publish -> swap

Reached from the training entry points' catalogue mode (`python -m training.moco` without `--data`):
`mode.py` is what they import, `stages.py` the resumable stages, `catalogue_source.py` the
`--data catalogue` spec.
"""
