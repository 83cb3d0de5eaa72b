"""Front-end processes and one engine process: ``server`` is the engine, ``client`` a front-end's side of it,
``protocol`` what travels between them (docs: the README's "Several worker processes")."""
