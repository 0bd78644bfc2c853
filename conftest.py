"""Every case file under cases/ becomes pytest items: see manualprop/pytest_plugin.py."""

pytest_plugins = ["manualprop.pytest_plugin"]
