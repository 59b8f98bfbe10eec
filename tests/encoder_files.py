"""Encoder files for tests: the session's tiny random encoder installed where a service looks for
its model, with the deploy form beside it (what the service's bootstrap would otherwise write at
every start, ~0.75 s; tests/service/test_deploy_form.py covers that path itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

from index.store import INFERENCE_ENCODER_FILE


def install_encoder(encoder_file: Path, target: Path) -> Path:
    """Copy `encoder_file` to `target` and its deploy form, if it has one, beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder_file, target)
    form = encoder_file.with_name(INFERENCE_ENCODER_FILE)
    if form.is_file():
        shutil.copyfile(form, target.with_name(INFERENCE_ENCODER_FILE))
    return target
