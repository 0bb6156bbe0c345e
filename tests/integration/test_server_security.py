"""Bearer token, TLS and mutual TLS, health and reflection (in-process server, fake engine)."""

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_utils import fake_server, make_certs

from distill_core.client import OutputSpec, TeacherClient, TeacherError

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
  return make_certs(tmp_path_factory.mktemp("certs"))


async def _calls(client):
  """One call of every Teacher method; returns the status code name of each."""
  outcomes = []
  for call in (client.info(timeout=5), client.forward(np.ones((1, 3), np.int32), OutputSpec(k=1), timeout=5),
               client.get_parameters("q_proj", timeout=5), _one_stream(client)):
    try:
      await call
      outcomes.append("OK")
    except TeacherError as e:
      outcomes.append(e.code.name)
  return outcomes


async def _one_stream(client):
  async with client.stream() as stream:
    await (await stream.submit(np.ones((1, 3), np.int32), OutputSpec(k=1)))


async def test_bearer_token(tmp_path):
  token_file = tmp_path / "token"
  token_file.write_text("s3cret-token\n")
  async with fake_server(f"security.auth_token_file={token_file}", "serve_parameters=true") as (_, address):
    for token, want in ((None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED"), ("s3cret-token", "OK")):
      async with TeacherClient(address, token=token) as client:
        assert await _calls(client) == [want] * 4, token
        assert await client.health() == "SERVING"  # health stays open for probes
    async with TeacherClient(address) as client:
      with pytest.raises(TeacherError) as e:
        await client.info()
      assert "bearer token" in e.value.message


async def test_token_can_guard_health():
  async with fake_server("security.auth_token=abc", "security.authenticate_health=true") as (_, address):
    async with TeacherClient(address) as client:
      with pytest.raises(TeacherError) as e:
        await client.health()
      assert e.value.code == UNAUTHENTICATED
    async with TeacherClient(address, token="abc") as client:
      assert await client.health() == "SERVING"


async def test_tls(certs):
  tls = (f"security.tls_cert={certs['server']}", f"security.tls_key={certs['server_key']}")
  async with fake_server(*tls, "serve_parameters=true") as (_, address):
    port = address.rsplit(":", 1)[1]
    async with TeacherClient(f"localhost:{port}", root_certificates=str(certs["ca"])) as client:
      assert await _calls(client) == ["OK"] * 4
    async with TeacherClient(address) as client:  # plaintext against a TLS port
      with pytest.raises(TeacherError) as e:
        await client.info(timeout=3)
      assert e.value.code == grpc.StatusCode.UNAVAILABLE
    async with TeacherClient(f"localhost:{port}", root_certificates=str(certs["rogue_ca"])) as client:
      with pytest.raises(TeacherError) as e:  # server certificate not trusted
        await client.info(timeout=3)
      assert e.value.code == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls(certs):
  mtls = (f"security.tls_cert={certs['server']}", f"security.tls_key={certs['server_key']}",
          f"security.client_ca={certs['ca']}", "security.require_client_cert=true")
  async with fake_server(*mtls, "serve_parameters=true") as (_, address):
    target = "localhost:" + address.rsplit(":", 1)[1]
    ca = str(certs["ca"])
    async with TeacherClient(target, root_certificates=ca, client_cert=str(certs["client"]),
                             client_key=str(certs["client_key"])) as client:
      assert await _calls(client) == ["OK"] * 4
    for cert in (None, "rogue_client"):
      kwargs = {} if cert is None else dict(client_cert=str(certs[cert]), client_key=str(certs[f"{cert}_key"]))
      async with TeacherClient(target, root_certificates=ca, **kwargs) as client:
        with pytest.raises(TeacherError) as e:
          await client.info(timeout=3)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE, cert


async def test_reflection_lists_services():
  async with fake_server() as (_, address), grpc.aio.insecure_channel(address) as channel:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"distill.teacher.v1.Teacher", "grpc.health.v1.Health"} <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="distill.teacher.v1.Teacher")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    assert responses[0].file_descriptor_response.file_descriptor_proto


async def test_plaintext_health_listener_next_to_tls(certs):
  """health_address: probes get health in plaintext; the Teacher service is not there, only on TLS."""
  from server_utils import free_port
  health = f"127.0.0.1:{free_port()}"
  async with fake_server(f"security.tls_cert={certs['server']}", f"security.tls_key={certs['server_key']}",
                         "security.auth_token=abc", f"health_address={health}") as (server, address):
    async with TeacherClient(health) as plain:
      assert await plain.health() == "SERVING"
      with pytest.raises(TeacherError) as e:
        await plain.info(timeout=5)
      assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    async with TeacherClient(address, root_certificates=certs["ca"], token="abc") as client:
      assert (await client.info(timeout=5)).replica_id == server.servicer.replica_id
    await server.drain()
    async with TeacherClient(health) as plain:
      with pytest.raises(TeacherError):
        await plain.health(timeout=2)
