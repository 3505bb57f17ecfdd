"""`python -m tff_medical.crosssilo.superlink --identity-file PATH FLOWER_ARGS`: flower-superlink
with mutual TLS, node identities bound to certificates, and a coordinator-only Driver API.

FLOWER_ARGS are Flower 1.12's flower-superlink arguments; see tff_medical.crosssilo.transport for
why client certificates are enforced here rather than by Flower, and tff_medical.crosssilo.
identity for the binding of certificate, node key and node id (written to PATH).
"""

import sys

from tff_medical.crosssilo import identity
from tff_medical.crosssilo import transport

IDENTITY_FLAG = '--identity-file'


def _take_flag(argv: list[str], name: str) -> str:
  """Removes `name VALUE` from argv (Flower's parser would refuse it); returns VALUE."""
  if name not in argv or argv.index(name) + 1 >= len(argv):
    sys.exit(f'error: {name} PATH is required.')
  at = argv.index(name)
  value = argv[at + 1]
  del argv[at:at + 2]
  return value


def _flag_value(argv: list[str], name: str) -> str:
  if name not in argv or argv.index(name) + 1 >= len(argv):
    sys.exit(f'error: {name} PATH is required.')
  return argv[argv.index(name) + 1]


def main() -> None:
  identity_path = _take_flag(sys.argv, IDENTITY_FLAG)
  enrolled = _flag_value(sys.argv, '--auth-list-public-keys')
  transport.require_client_certificates()
  # pylint: disable=g-import-not-at-top
  from flwr.server import app as flwr_app
  from flwr.server.superlink.driver import driver_grpc
  # pylint: enable=g-import-not-at-top
  binding = identity.make_interceptor_class()
  flwr_app.AuthenticateServerInterceptor = lambda state: binding(state, enrolled, identity_path)
  create_server = driver_grpc.generic_create_grpc_server

  def create_driver_server(*args, **kwargs):
    kwargs['interceptors'] = [identity.make_coordinator_only_interceptor()]
    return create_server(*args, **kwargs)

  driver_grpc.generic_create_grpc_server = create_driver_server
  flwr_app.run_superlink()


if __name__ == '__main__':
  main()
