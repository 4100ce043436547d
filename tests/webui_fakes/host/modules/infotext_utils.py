"""Fake of modules.infotext_utils: quote / unquote, parsing the parameter line, and pasting into fields."""
import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def create_infotext(prompt: str, params: dict) -> str:
    return prompt + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def parse_generation_parameters(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    res = {"Prompt": "\n".join(lines)}
    for k, v in re_param.findall(last):
        res[k] = unquote(v.strip()) if v.strip().startswith('"') else v.strip()
    return res


def paste(infotext: str, fields: list) -> list:
    """What connect_paste's paste_func does: parse, let extensions edit params, then one value per field
    (None where the field stays as it is), converted to the type of the field's current value."""
    from modules import script_callbacks

    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    out = []
    for component, key in fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            out.append(None)
            continue
        valtype = type(component.value)
        if valtype is bool and v == "False":
            out.append(False)
        elif valtype is int:
            out.append(float(v))
        else:
            out.append(valtype(v))
    return out
