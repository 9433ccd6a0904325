"""Tokenizers: text -> token ids for a model's text tower.

- ``tokenizers.py``: what a model uses, behind one interface: ``tokenizer_of(model)`` (or
  ``tokenizer_for(config, files)``) gives a ``ClipTokenizer`` or a ``PieceTokenizer``
  (``TextTokenizer.encode_texts``).
- ``bpe.py``: CLIP's byte-level BPE (OpenAI's ``clip.tokenize``).
- ``canonicalize.py``: how text is cleaned first (``config.text_clean``: SigLIP's canonical form,
  MetaCLIP 2's whitespace tidying).
- SentencePiece vocabularies (SigLIP's T5, SigLIP 2's Gemma, MetaCLIP 2's XLM-V), read from
  scratch: ``spm_model.py`` (the ``.model`` protobuf and its character map), ``pieces.py``
  (Unigram and BPE segmentation), ``sentencepiece.py`` (a ``.model`` as ``sentencepiece`` runs
  it), ``tokenizer_json.py`` and ``hf_stages.py`` (a ``tokenizer.json`` as ``tokenizers`` runs it).
"""
