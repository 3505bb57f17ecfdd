"""tff_medical: federated learning on medical images with per-category differential privacy."""

import setuptools

setuptools.setup(
    name='tff_medical',
    version='0.1.0',
    description=(
        'Federated learning on medical images with differential privacy tuned per image category.'
    ),
    python_requires='>=3.11,<3.12',
    packages=setuptools.find_packages(include=['tff_medical', 'tff_medical.*']),
    package_data={'tff_medical': ['data/*.json', 'monitoring/vendor/*', 'monitoring/templates/*']},
    # Not a Python module: a shared library preloaded into TFF's C++ worker so that its gRPC
    # server listens on a private Unix socket, not a TCP port (the worker has no flag for that).
    ext_modules=[
        setuptools.Extension(
            'tff_medical.runtime._loopback_bind',
            sources=['tff_medical/runtime/loopback_bind.c'],
            libraries=['dl'],
        )
    ],
    # The runtime set is pinned in requirements/lock.txt and installed with --no-deps, because
    # TFF 0.87.0's own jaxlib pin cannot be met here (see README).
    install_requires=[],
)
