"""Decode-time parameters (`diffarc decode --param`, `cat --param`): one archive decoded for fidelity or for
realism, on a real local Ray cluster."""

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffarc.codecs import container
from diffarc.codecs.errors import ParameterError
from diffarc.codecs.registry import codec_for_header
from diffarc.jobs.cli import main
from diffarc.pipeline.decode import cat_item, run_decode
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.keys import output_name

from ..codecs.test_corrdiff import save_models

pytestmark = pytest.mark.slow


def read_png(data_or_path) -> np.ndarray:
    with Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path) as image:
        return np.asarray(image.convert("RGB"))


def test_perception_set_at_decode_time_overrides_every_streams_own(ray_cluster, image_folder, tmp_path):
    models = save_models(tmp_path / "models")
    arc = str(tmp_path / "arc")
    # One actor a job: each loads torch and the models, and what is tested is the parameters, not the split.
    run_encode(str(image_folder), arc, EncodeOptions("corrdiff", {"model": models, "quality": 20, "steps": 1}, actors=1))
    result = CliRunner().invoke(
        main, ["decode", arc, str(tmp_path / "fidelity"), "--param", "perception=0", "--model", models, "--actors", "1"]
    )
    assert result.exit_code == 0, result.output
    run_decode(arc, str(tmp_path / "default"), model=models, actors=1)
    changed = 0
    for key in ("a.png", "sub/e.jpg"):
        stream = cat_item(arc, key, stream=True)
        end_to_end = codec_for_header(container.unpack(stream)[0], model=models)
        end_to_end.override({"perception": 0.0})
        expected = end_to_end.decode([stream])[0]
        assert np.array_equal(read_png(tmp_path / "fidelity" / output_name(key, "png")), expected)
        assert np.array_equal(read_png(cat_item(arc, key, model=models, params={"perception": "0"})), expected)
        changed += not np.array_equal(read_png(tmp_path / "default" / output_name(key, "png")), expected)
    assert changed  # the streams' own perception (½) decodes to other pictures
    # A parameter that is not decode-time is refused before any work, naming it.
    with pytest.raises(ParameterError, match="'quality' that a decoder may set"):
        run_decode(arc, str(tmp_path / "refused"), model=models, params={"quality": "30"})
    result = CliRunner().invoke(main, ["decode", arc, str(tmp_path / "refused"), "--param", "quality=30"])
    assert result.exit_code == 1 and "'quality' that a decoder may set" in result.output
