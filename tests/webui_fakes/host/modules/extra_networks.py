"""Fake of modules.extra_networks (A1111 1.10.1; Forge's is the same file): the registry, `<name:args>` parsing,
and activate/deactivate as processing calls them. Every registered network is activated on every batch, with an
empty list where the prompt does not name it; exceptions inside activate/deactivate are printed, not raised."""
import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry: dict = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:  # the first prompt's networks, as A1111
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def activate(p, extra_network_data):
    for name, network in extra_network_registry.items():
        try:
            network.activate(p, extra_network_data.get(name, []))
        except Exception as e:
            print(f"activating extra network {name} with arguments {extra_network_data.get(name)}: {e}")


def deactivate(p, extra_network_data):
    for name, network in extra_network_registry.items():
        try:
            network.deactivate(p)
        except Exception as e:
            print(f"deactivating extra network {name}: {e}")
