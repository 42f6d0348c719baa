"""Rebuild the tiny default model folder: a ~1M-parameter Llama config and a byte-level BPE tokenizer
trained here on tiny-safety's text (so the task's words are single tokens, and any other text still
tokenises byte by byte). No weights are shipped: a stage that loads this folder initialises the model
from config.json with its --seed (common.load_causal_lm says so in the log).

    python assets/tiny-llama/build.py
"""
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "data"))
import tiny_safety  # noqa: E402

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def main():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_safety.corpus() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=512)
    fast.save_pretrained(HERE)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, attention_dropout=0.0,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(HERE)
    print(f"wrote {HERE}: vocab {len(fast)}")


if __name__ == "__main__":
    main()
