# Numbers, booleans and null written as strings where the config schema asks for them are
# read as such before validation: Snakemake passes the values of a nested
# `--config 'key={...}'` as strings, and YAML 1.1 (PyYAML) reads `1e-5`, without a dot,
# as a string. In the free-form mappings (backend_options, fsdp, chat_template_kwargs) the
# schema's option_value asks for a number, boolean or null wherever a string reads as one.
import math
import re
from pathlib import Path

import jsonschema
import yaml

NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
INTEGER = re.compile(r"[+-]?\d+")
NOT_TYPED = object()


def typed_value(text, types):
    """`text` read as the first of the JSON-schema `types` it fits, else NOT_TYPED."""
    text = text.strip()
    for kind in [types] if isinstance(types, str) else types:
        if kind in ("number", "integer") and NUMBER.fullmatch(text):
            value = int(text) if INTEGER.fullmatch(text) else float(text)
            if kind == "number":
                return value
            if float(value).is_integer():
                return int(value)
        elif kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        elif kind == "null" and text.lower() in ("null", "~", ""):
            return None
    return NOT_TYPED


def string_type_errors(errors):
    """The schema's complaints that a string stands where another type belongs, also those
    nested under allOf/oneOf."""
    for error in errors:
        if error.validator == "type" and isinstance(error.instance, str):
            yield error
        yield from string_type_errors(error.context)


def coerce_config_types(config, schema_file):
    return coerce_types(config, yaml.safe_load(Path(schema_file).read_text()))


def coerce_types(config, schema):
    """Replaces, in place, every string of `config` that stands where the schema wants a number,
    integer, boolean or null and reads as one; anything else is left for validate() to refuse."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    changed = True
    while changed:  # a fixed value can uncover errors deeper down (e.g. under oneOf)
        changed = False
        for error in list(string_type_errors(validator.iter_errors(config))):
            value = typed_value(error.instance, error.validator_value)
            *parents, key = error.absolute_path
            parent = config
            for step in parents:
                parent = parent[step]
            if value is not NOT_TYPED and isinstance(parent[key], str):
                parent[key] = value
                changed = True
    return config


def non_finite_numbers(value, where="config"):
    """The keys (dotted) of NaN and infinite numbers anywhere in the config: YAML reads .nan and .inf
    as numbers, and JSON schema's bounds do not catch NaN."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from non_finite_numbers(item, f"{where}[{n}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield where.removeprefix("config.")
