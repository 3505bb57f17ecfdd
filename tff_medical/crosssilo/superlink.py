"""`python -m tff_medical.crosssilo.superlink FLOWER_ARGS`: flower-superlink with mutual TLS.

Same arguments as Flower 1.12's flower-superlink; see tff_medical.crosssilo.transport for why
client certificates are enforced here rather than by Flower.
"""

from tff_medical.crosssilo import transport

if __name__ == '__main__':
  transport.require_client_certificates()
  from flwr.server.app import run_superlink  # pylint: disable=g-import-not-at-top
  run_superlink()
