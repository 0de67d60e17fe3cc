"""The benchmarks' tokenizer: a 4,096-entry byte-level BPE trained on CPython's pydoc topics
(on disk with Python, nothing downloaded), for the random-weight language models they build."""

from __future__ import annotations


def pydoc_tokenizer():
    """A `PreTrainedTokenizerFast` with bos `<s>` and eos `</s>`, the same on every call."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([topics[name] for name in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
