"""The model families and what describes them, without I/O.

``clip.py`` (OpenAI's CLIP towers) and ``mixer.py`` (MLP-Mixer blocks) hold the modules,
``config.py`` the one config dataclass, ``factory.py`` config + shapes -> model,
``convert.py`` foreign key schemas and configs -> ours (pure), ``registry.py`` which weights exist.
"""
