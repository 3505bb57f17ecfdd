"""Cross-silo deployment: sites that never send raw images.

Flower 1.12 carries the network part (SuperLink/SuperNode, SecAgg+, TLS, node authentication);
the privacy part is the simulation's, applied to the securely summed values.

  provisioning   CA, coordinator and site certificates, node-auth keys, enrolled list
  transport      mutual TLS around Flower's SuperLink, driver and site connection
  superlink      `python -m` entry point: flower-superlink with client certificates required
  mechanism      the round's DP math on a secure sum (same TF Privacy queries as TFF's factory)
  secagg         one SecAgg+ round (coordinator) and the masked ClientApp (site)
  site_worker    a site's local training and encoding
  site_runtime   a site's process: SuperNode loop, reconnects, test fault hooks
  coordinator    the coordinator's round loop, run directory, resume
"""
