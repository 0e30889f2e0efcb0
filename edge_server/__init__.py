"""The edge: serving a model family's large model for the first steps of each request (``rise-edge``).

Importing any of its modules first keeps diffusers' duplicate-optimum notice out of the output
(:func:`edge_server.logs.silence_library_noise`), before any of them imports diffusers.
"""

from edge_server.logs import silence_library_noise

silence_library_noise()
