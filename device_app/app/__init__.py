"""The RISE device app: a Kivy front end over a plain-Python controller.

* :mod:`device_app.app.settings`: the persisted settings (JSON, token file mode 0600);
* :mod:`device_app.app.offline`: device-only generation (text encoder from the bundle);
* :mod:`device_app.app.backends`: the networked backend (``EdgeClient`` on an asyncio loop
  in a worker thread) and the offline backend (a worker thread);
* :mod:`device_app.app.controller`: the app's state and commands, no Kivy import, driven
  by the tests without a window;
* :mod:`device_app.app.app` + ``rise.kv``: the Kivy app (``rise-device app``).

Nothing here imports Kivy except :mod:`device_app.app.app` and :mod:`device_app.app.screenshots`.
"""
