"""langchain-openai against the server (issue 17): ChatOpenAI and the completions-model
OpenAI, invoked and streamed, agree with the openai SDK's answers, and their logprobs and usage
are the text's."""

import pytest

pytest.importorskip("openai")
langchain_openai = pytest.importorskip("langchain_openai")

from test_server import KEY, MODEL, PROMPT, client, server  # noqa: F401 - fixtures


def test_chat_openai_invoke_and_stream_match_the_sdk_with_logprobs_and_usage(client, server):
    messages = [{"role": "user", "content": "Who is Romeo?"}]
    sdk = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                         temperature=0, logprobs=True,
                                         extra_body={"ignore_eos": True})
    chat = langchain_openai.ChatOpenAI(base_url=server[0] + "/v1", api_key=KEY, model=MODEL,
                                       temperature=0, max_tokens=8, logprobs=True,
                                       max_retries=0,
                                       extra_body={"ignore_eos": True})
    msg = chat.invoke([("user", "Who is Romeo?")])
    assert msg.content == sdk.choices[0].message.content
    tokens = [e["token"] for e in msg.response_metadata["logprobs"]["content"]]
    assert "".join(tokens) == msg.content
    assert msg.usage_metadata["output_tokens"] == sdk.usage.completion_tokens == len(tokens)
    streamed = "".join(chunk.content for chunk in chat.stream([("user", "Who is Romeo?")]))
    assert streamed == msg.content


def test_completions_model_matches_the_sdk(client, server):
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    llm = langchain_openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, model=MODEL,
                                  temperature=0, max_tokens=8, max_retries=0,
                                  extra_body={"ignore_eos": True})
    assert llm.invoke(PROMPT) == sdk.choices[0].text
    assert "".join(llm.stream(PROMPT)) == sdk.choices[0].text
