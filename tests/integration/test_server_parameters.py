"""GetParameters: off unless enabled, an optional separate token, RE2 patterns of bounded length, a chunk floor."""

import re

import grpc
import numpy as np
import pytest
from server_utils import fake_server

from distill_core.client import OutputSpec, TeacherClient, TeacherError
from distill_core.proto import teacher_pb2 as pb
from teacher_server.config import MIN_CHUNK_BYTES
from support.fake_engine import FakeEngine, fake_info
from teacher_server.parameters import MAX_NAME_REGEX_CHARS

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def _code(coro) -> str:
  try:
    await coro
  except TeacherError as e:
    return e.code.name
  return "OK"


async def test_off_by_default():
  async with fake_server() as (_, address), TeacherClient(address) as client:
    assert not (await client.info()).serves_parameters
    with pytest.raises(TeacherError) as e:
      await client.get_parameters(".*")
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED and "serve_parameters" in e.value.message
  async with fake_server("serve_parameters=true") as (_, address), TeacherClient(address) as client:
    assert (await client.info()).serves_parameters
    assert len(await client.get_parameters(".*")) == 2


async def test_chunks_reassemble_and_floor():
  engine = FakeEngine(fake_info(vocab_size=4096))  # embedding: 4096 x 8 float32 = 128 KiB = 2 chunks
  async with fake_server("serve_parameters=true", engine=engine) as (_, address), TeacherClient(address) as client:
    ref = dict(engine.parameters(re.compile(".")))
    params = await client.get_parameters(r"^embed_tokens\.", chunk_bytes=MIN_CHUNK_BYTES)
    assert list(params) == ["embed_tokens.embedding"]
    np.testing.assert_array_equal(params["embed_tokens.embedding"], ref["embed_tokens.embedding"])
    request = pb.GetParametersRequest(name_regex="embed", chunk_bytes=MIN_CHUNK_BYTES)
    chunks = [c async for c in client.stub.GetParameters(request)]
    assert [c.offset for c in chunks] == [0, MIN_CHUNK_BYTES]
    for bad in (1, MIN_CHUNK_BYTES - 1, -5):
      with pytest.raises(TeacherError) as e:
        await client.get_parameters(".*", chunk_bytes=bad)
      assert e.value.code == INVALID and e.value.message.startswith("chunk_bytes:"), bad


async def test_patterns_are_re2_bounded_and_echoed_short():
  async with fake_server("serve_parameters=true") as (_, address), TeacherClient(address) as client:
    # Exponential for a backtracking matcher on every ~30-character name; linear in RE2.
    with pytest.raises(TeacherError) as e:
      await client.get_parameters(r"^(([a-z_.0-9]*)*)*X$", timeout=20)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    for regex, fragment in (("", "required"), ("(", "invalid RE2 pattern"), ("(?=q)", "invalid RE2 pattern"),
                            ("q" * 30_000, f"exceed the limit of {MAX_NAME_REGEX_CHARS}"),
                            ("(" * 1000, "invalid RE2 pattern"), ("x" * 1000, "no parameter matches")):
      with pytest.raises(TeacherError) as e:
        await client.get_parameters(regex, timeout=20)
      assert e.value.message.startswith("name_regex:") and fragment in e.value.message, regex[:20]
      assert len(e.value.message) < 400, regex[:20]
    assert list(await client.get_parameters(r"q_proj\.kernel$")) == ["layers.0.self_attn.q_proj.kernel"]


async def test_separate_parameters_token():
  async with fake_server("serve_parameters=true", "security.auth_token=infer",
                         "security.parameters_token=weights") as (_, address):
    tokens = np.ones((1, 3), np.int32)
    for token, want in ((None, ("UNAUTHENTICATED", "UNAUTHENTICATED")), ("infer", ("OK", "PERMISSION_DENIED")),
                        ("weights", ("OK", "OK"))):
      async with TeacherClient(address, token=token) as client:
        got = (await _code(client.forward(tokens, OutputSpec(k=1), timeout=5)),
               await _code(client.get_parameters(".*", timeout=5)))
        assert got == want, token
  async with fake_server("serve_parameters=true", "security.parameters_token=weights") as (_, address):
    async with TeacherClient(address) as client:  # inference open, weights behind the token
      assert await _code(client.forward(tokens, OutputSpec(k=1), timeout=5)) == "OK"
      assert await _code(client.get_parameters(".*", timeout=5)) == "PERMISSION_DENIED"
