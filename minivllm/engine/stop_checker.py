"""When a sequence is done, and the text it returns (vLLM's StopChecker): at EOS, a stop token, a
stop string or a length limit."""
import os

from minivllm.engine.sequence import Sequence


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int, tokenizer=None):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    def check(self, seq: Sequence) -> bool:
        """Whether ``seq`` is done after its newest token; sets its finish_reason and stop_reason,
        and its text when a stop string cut it."""
        params, token = seq.sampling_params, seq.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        # vLLM looks for stop strings only once min_tokens tokens are out.
        elif params.stop and seq.num_completion_tokens > params.min_tokens and self._cut_at_stop_string(seq):
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        else:
            return False
        return True

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        """Looks for a stop string that the newest token completed. The whole output is decoded
        again (a token's text can depend on the ones before it: partial UTF-8 characters, leading
        spaces), and an occurrence counts only where it reaches past the text that is unchanged
        since the last check, as in vLLM: one from before ``min_tokens`` does not stop later. The
        cost falls on requests with stop strings only."""
        ids, stops = seq.completion_token_ids, seq.sampling_params.stop
        before = seq.checked_text if seq.checked_text is not None else self.detokenize(ids[:-1])
        text = seq.checked_text = self.detokenize(ids)
        unchanged = len(os.path.commonprefix([before, text]))
        found = [(at, stop) for stop in stops if (at := text.find(stop, max(0, unchanged - len(stop) + 1))) >= 0]
        if not found:
            return False
        at, stop = min(found)
        seq.stop_reason = stop
        seq.text = text[:at + len(stop) if seq.sampling_params.include_stop_str_in_output else at]
        return True

    def output_text(self, seq: Sequence) -> str:
        if seq.text is not None:
            return seq.text
        ids = seq.completion_token_ids
        if seq.finish_reason == "stop" and not seq.sampling_params.include_stop_str_in_output:
            ids = ids[:-1]  # the EOS or stop token's own text stays out, as in vLLM
        return self.detokenize(ids)

    def detokenize(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)
