"""Test setup: 8 fake CPU devices so that meshes can be tested without accelerators.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything touches jax devices.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
