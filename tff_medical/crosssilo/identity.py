"""Which site a Fleet node is, taken from the authenticated connection, never from what it says.

What Flower 1.12 leaves unchecked and what `BindingInterceptor` adds: docs/DESIGN.md.
"""

import base64
import json
import os
import threading
from typing import Any

from tff_medical import fileio
from tff_medical.errors import ConfigError

IDENTITY_FILE = 'node_identities.json'
SITE_PREFIX = 'site:'


def enrolled_sites(enrolled_csv: str) -> dict[bytes, str]:
  """{Flower's encoding of a node-auth public key: site name} from enrolled_sites.csv."""
  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization
  from flwr.common.secure_aggregation.crypto.symmetric_encryption import public_key_to_bytes
  # pylint: enable=g-import-not-at-top
  names = {}
  with open(enrolled_csv, encoding='utf-8') as f:
    for line in f:
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 3 or not parts[2].startswith(SITE_PREFIX):
        raise ConfigError(f'each line of {enrolled_csv} must be "KEYTYPE KEY site:NAME". Found '
                          f'{len(parts)} fields in one (re-enroll with experiments/provision.py).')
      key = serialization.load_ssh_public_key(' '.join(parts[:2]).encode())
      names[public_key_to_bytes(key)] = parts[2][len(SITE_PREFIX):]
  return names


def read_identities(path: str) -> dict[int, str]:
  """{node id: site} of the nodes that proved their key (missing file: none yet)."""
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise ConfigError(f'the SuperLink\'s node identities {path} must be readable JSON. '
                      f'Found: {e}.') from None
  return {int(node): entry['site'] for node, entry in raw.items() if entry.get('verified')}


def make_interceptor_class():
  """BindingInterceptor (built on first use: Flower is imported only in processes that run it)."""
  # pylint: disable=g-import-not-at-top
  import grpc
  from flwr.proto.fleet_pb2 import CreateNodeRequest  # pylint: disable=no-name-in-module
  from flwr.proto.fleet_pb2 import DeleteNodeRequest  # pylint: disable=no-name-in-module
  from flwr.server.superlink.fleet.grpc_rere import server_interceptor
  # pylint: enable=g-import-not-at-top

  class BindingInterceptor(server_interceptor.AuthenticateServerInterceptor):
    """Flower's node authentication, plus certificate-to-key binding and proof of the key."""

    def __init__(self, state, enrolled_csv: str, identity_path: str):
      super().__init__(state)
      self._names = enrolled_sites(enrolled_csv)
      self._path = identity_path
      self._nodes: dict[str, dict[str, Any]] = {}
      self._lock = threading.Lock()

    def _save(self, node_id: int, entry) -> None:
      with self._lock:
        if entry is None:
          changed = self._nodes.pop(str(node_id), None) is not None
        else:
          changed = self._nodes.get(str(node_id)) != entry
          self._nodes[str(node_id)] = entry
        if changed:
          fileio.write_atomic(self._path, json.dumps(self._nodes, sort_keys=True), mode=0o600)

    def _generic_auth_unary_method_handler(self, method_handler):
      flower = super()._generic_auth_unary_method_handler(method_handler)

      def handler(request, context):
        metadata = dict(context.invocation_metadata())
        try:
          key = base64.urlsafe_b64decode(metadata.get(server_interceptor._PUBLIC_KEY_HEADER, ''))  # pylint: disable=protected-access
        except ValueError:
          key = b''
        site = self._names.get(key)
        certificate = context.auth_context().get('x509_common_name', [])
        if site is None or list(certificate) != [f'{SITE_PREFIX}{site}'.encode()]:
          context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        'Access denied: the certificate and the node key are not one site')
        response = flower.unary_unary(request, context)  # Aborts on a bad key or HMAC.
        if isinstance(request, CreateNodeRequest):
          # Registered on the public key alone: not counted until a request proves the key.
          self._save(response.node.node_id, {'site': site, 'verified': False})
        elif isinstance(request, DeleteNodeRequest):
          self._save(request.node.node_id, None)
        else:
          node_id = self.state.get_node_id(key)
          if node_id is not None:
            self._save(node_id, {'site': site, 'verified': True})
        return response

      return grpc.unary_unary_rpc_method_handler(
          handler, request_deserializer=flower.request_deserializer,
          response_serializer=flower.response_serializer)

  return BindingInterceptor


COORDINATOR_CN = b'coordinator'


def make_coordinator_only_interceptor():
  """A gRPC interceptor for the Driver API: only the coordinator's certificate may drive rounds.

  The SuperLink's TLS accepts any certificate of our CA on both APIs; without this a site (whose
  certificate is CA-signed too) on the coordinator's machine could create runs and read results.
  """
  import grpc  # pylint: disable=g-import-not-at-top

  class CoordinatorOnly(grpc.ServerInterceptor):

    def intercept_service(self, continuation, handler_call_details):
      handler = continuation(handler_call_details)
      if handler is None or handler.unary_unary is None:
        return handler  # Flower 1.12's Driver API is unary only; nothing else to guard.
      inner = handler.unary_unary

      def checked(request, context):
        if list(context.auth_context().get('x509_common_name', [])) != [COORDINATOR_CN]:
          context.abort(grpc.StatusCode.PERMISSION_DENIED,
                        'Access denied: the Driver API is for the coordinator only')
        return inner(request, context)

      return grpc.unary_unary_rpc_method_handler(
          checked, request_deserializer=handler.request_deserializer,
          response_serializer=handler.response_serializer)

  return CoordinatorOnly()
