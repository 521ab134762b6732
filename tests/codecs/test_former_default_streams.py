"""Streams of builtin:ldm-small, the default model before issue 22, decode to the pixels they decoded to then.

The streams and the SHA-256 of their decoded pixels were made with the code of commit 98bffad, before the
default moved to builtin:taef2 (a 32 × 48 `photo_like` picture, seed 5). The decoder is found as
`diffarc decode` finds it, from the stream alone: builtin:ldm-small is among each codec's built-in weights.
"""

import hashlib

import pytest

from diffarc.codecs.registry import codec_for_header, read_header

STREAMS = {
    "ddcm": (
        "063f37dcb0d03f121038ddad0a1068cdfcf7eb24e4f55998540940bbdc41691e",
        "4446415201046464636d007d7b2261746f6d73223a312c22636f6465626f6f6b223a36342c22636f65665f62697473223a322c22636f6c6f7572"
        "223a22616666696e65222c22707265636973696f6e223a2266703332222c2273656564223a302c2273656c656374696f6e223a226172676d6178"
        "222c227374657073223a382c2274696c65223a347d20c61e02a66fb54a7fa48608520d36979d2670605926122aac4e6500127115727900000030"
        "00000020000000235f3708337bfc39c559ce60633dd037443c3eb51ac087c1bebbfd40f840ea56d1564e55a61a8e7b"
    ),
    "latent-denoise": (
        "33b3889041d9f0338a06c16d9afeaccb53aa3eb1431b0f7f5bae5763d2df0c04",
        "44464152010e6c6174656e742d64656e6f69736500507b22636f6c6f7572223a22616666696e65222c22707265636973696f6e223a2266703332"
        "222c2273746570223a302e392c227374657073223a342c2274696d6573746570223a2270726564696374227d20805cb92041cdeffe42fd6e4e98"
        "2f6312489cb58517bfacdf201fc4f42d16b8320000003000000020000000a27300efa942aeebb3c3b026aeeea7f736deb08b2e0ca2d79e823480"
        "b0ec2e0b2ccfb9903dc03e4c3b513f8f3c103ff93eb03dfd3db33ffb419e3e603fb13f1e40ae40ffff0100ffff010004000000a83839762362dc"
        "ffc544f14167473d5d711c760c329474f7a514c92b00f54bf5ecb0ae2c7b6dada0760733b8fab2be7ae9cfa5798b367238df15024f033d02350d"
        "b52a3c2c39512c02bceb39243c41d473d42d51319a4c75"
    ),
    "corrdiff-latent": (
        "d2f53a34fed3da966314862ce693eaf47a9581a18f6b6d6587b567e88ef631c1",
        "44464152010f636f7272646966662d6c6174656e7400757b22636f6c6f7572223a22616666696e65222c226d61785f70736e725f6c6f7373223a"
        "302e332c2270657263657074696f6e223a302e352c22707265636973696f6e223a2266703332222c2273746570223a302e392c22737465707322"
        "3a342c2274696d6573746570223a2270726564696374227d20b968222cc87ca6463375609ecd2525d39be8b91ae4ed1adce5617ccce0a1213200"
        "00003000000020000000a3017300efa942aeebb3c3b026aeeea7f736deb08b2e0ca2d79e823480b0ec2e0b2ccfb9903dc03e4c3b513f8f3c103f"
        "f93eb03dfd3db33ffb419e3e603fb13f1e40ae40ffff0100ffff010004000000a83839762362dcffc544f14167473d5d711c760c329474f7a514"
        "c92b00f54bf5ecb0ae2c7b6dada0760733b8fab2be7ae9cfa5798b367238df15024f183ca83548b6143c2f38c93523bb483a453a75d14bd4fa50"
        "d5a97c80"
    ),
}


@pytest.mark.parametrize(
    "codec", [pytest.param(name, marks=pytest.mark.slow) if name == "corrdiff-latent" else name for name in sorted(STREAMS)]
)
def test_a_stream_of_the_former_default_model_decodes_bit_identically_without_naming_it(codec):
    digest, hex_stream = STREAMS[codec]
    stream = bytes.fromhex(hex_stream)
    decoder = codec_for_header(read_header(stream))
    assert decoder.name == codec and decoder.locations["model"] == "builtin:ldm-small"
    assert hashlib.sha256(decoder.decode([stream])[0].tobytes()).hexdigest() == digest
