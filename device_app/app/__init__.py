"""The RISE device app: a Kivy front end over a plain-Python controller.

* :mod:`device_app.app.settings`: the persisted settings (JSON, token file mode 0600), the bundle in
  use and the bundles folder Settings lists (:mod:`device_app.bundle_library`);
* :mod:`device_app.app.offline`: device-only generation (text encoder from the bundle);
* :mod:`device_app.app.backends`: the networked backend (``EdgeClient`` on an asyncio loop
  in a worker thread) and the offline backend (a worker thread), both cancellable; the quick
  bundle check run at start and in Settings;
* :mod:`device_app.app.gallery`: the gallery folder (PNGs with their parameters in text chunks,
  A1111's ``parameters`` and a JSON ``rise`` chunk), kept across restarts;
* :mod:`device_app.app.words`: what the app says, in plain words, and the technical details line;
* :mod:`device_app.app.prompt_help`: the hint, the example and the reading of a prompt for
  families with a grammar (the demo family's);
* :mod:`device_app.app.controller`: the app's state and commands, no Kivy import, driven
  by the tests without a window;
* :mod:`device_app.app.app` + ``rise.kv``: the Kivy app (``rise-device app``), one layout from a
  360x640 phone to a desktop window;
* :mod:`device_app.app.layout_check`: does every widget fit the window (the real-window tests).

Nothing here imports Kivy except :mod:`device_app.app.app`, :mod:`device_app.app.layout_check` and
:mod:`device_app.app.screenshots`.
"""
