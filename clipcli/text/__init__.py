"""Tokenizers: text -> token ids for a model's text tower.

``bpe.py`` is CLIP's byte-level BPE (OpenAI's ``clip.tokenize``).
"""
