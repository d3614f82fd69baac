"""A stand-in for OBS's `obspython` module: exactly the functions obs/sdbridge_obs.py calls, with
the signatures of OBS's documentation (docs.obsproject.com: scripting, reference-properties,
reference-settings, reference-frontend-api), plus test-only helpers under `standin`.

Behaviour follows OBS where the script depends on it: settings fall back to the defaults set in
script_defaults; a button's callback must be a plain Python function (anything else adds no
button, as in OBS); it is called as callback(props, prop) and the properties are refreshed only
when it returns exactly True (standin.click returns whether they would be); timers are called by
the test (standin.run_timers()).
"""

import types

LOG_ERROR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 100, 200, 300, 400
OBS_TEXT_DEFAULT, OBS_TEXT_PASSWORD, OBS_TEXT_MULTILINE, OBS_TEXT_INFO = 0, 1, 2, 3
OBS_COMBO_TYPE_INVALID, OBS_COMBO_TYPE_EDITABLE, OBS_COMBO_TYPE_LIST = 0, 1, 2
OBS_COMBO_FORMAT_INVALID, OBS_COMBO_FORMAT_INT, OBS_COMBO_FORMAT_FLOAT, OBS_COMBO_FORMAT_STRING = 0, 1, 2, 3
OBS_FRONTEND_EVENT_SCENE_CHANGED = 8  # enum obs_frontend_event: STREAMING_STARTING = 0 ... SCENE_CHANGED = 8


class _Data:
    def __init__(self):
        self.values, self.defaults = {}, {}

    def get(self, name, fallback):
        return self.values.get(name, self.defaults.get(name, fallback))


class _Property:
    def __init__(self, kind, name, description, **details):
        self.kind, self.name, self.description, self.details = kind, name, description, details
        self.items = []  # list properties: (name, value)
        self.long_description = ""


class _Properties:
    def __init__(self):
        self.items = {}

    def add(self, prop):
        if prop.name in self.items:
            raise AssertionError(f"two properties named {prop.name!r}")
        self.items[prop.name] = prop
        return prop


class _Source:
    def __init__(self, name):
        self.name, self.references = name, 1


# ---- settings (reference-settings: obs_data_t)

def obs_data_create():
    return _Data()


def obs_data_release(data):
    _check(data, _Data, "obs_data_release")


def _check(value, kind, function):
    if not isinstance(value, kind):
        raise TypeError(f"{function}: expected {kind.__name__}, got {type(value).__name__}")


def _typed(kind):
    def get(data, name):
        _check(data, _Data, "obs_data_get_" + kind.__name__)
        return kind(data.get(name, kind()))
    return get


obs_data_get_string = _typed(str)
obs_data_get_int = _typed(int)
obs_data_get_double = _typed(float)
obs_data_get_bool = _typed(bool)


def _setter(kind, field):
    def set_value(data, name, value):
        _check(data, _Data, "obs_data_set")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
        getattr(data, field)[name] = value
    return set_value


obs_data_set_string, obs_data_set_int = _setter(str, "values"), _setter(int, "values")
obs_data_set_double, obs_data_set_bool = _setter((int, float), "values"), _setter(bool, "values")
obs_data_set_default_string, obs_data_set_default_int = _setter(str, "defaults"), _setter(int, "defaults")
obs_data_set_default_double, obs_data_set_default_bool = _setter((int, float), "defaults"), _setter(bool, "defaults")


# ---- properties (reference-properties)

def obs_properties_create():
    return _Properties()


def obs_properties_add_text(props, name, description, text_type):
    return props.add(_Property("text", name, description, text_type=text_type))


def obs_properties_add_int(props, name, description, min, max, step):
    if not all(isinstance(v, int) and -2**31 <= v < 2**31 for v in (min, max, step)):
        raise TypeError(f"{name}: int property bounds must be C ints")
    return props.add(_Property("int", name, description, min=min, max=max, step=step))


def obs_properties_add_float_slider(props, name, description, min, max, step):
    return props.add(_Property("float_slider", name, description, min=float(min), max=float(max), step=float(step)))


def obs_properties_add_bool(props, name, description):
    return props.add(_Property("bool", name, description))


def obs_properties_add_list(props, name, description, combo_type, combo_format):
    return props.add(_Property("list", name, description, combo_type=combo_type, combo_format=combo_format))


def obs_property_list_add_string(prop, name, value):
    prop.items.append((name, value))
    return len(prop.items) - 1


def obs_properties_add_button(props, name, text, callback):
    # OBS (obs-scripting-python.c): `if (!PyFunction_Check(py_cb)) return python_none();`: a bound
    # method, a functools.partial, a builtin or a callable object adds nothing and returns None
    if not isinstance(callback, types.FunctionType):
        return None
    return props.add(_Property("button", name, text, callback=callback))


def obs_property_set_long_description(prop, long_description):
    prop.long_description = long_description


# ---- frontend, sources, timers, log (reference-frontend-api, scripting)

_callbacks, _timers, _log = [], [], []
_current_scene = [None]


def obs_frontend_add_event_callback(callback):
    _callbacks.append(callback)


def obs_frontend_get_current_scene():
    name = _current_scene[0]
    return None if name is None else _Source(name)


def obs_source_get_name(source):
    return source.name


def obs_source_release(source):
    source.references -= 1


def timer_add(callback, milliseconds):
    _timers.append((callback, milliseconds))


def timer_remove(callback):
    _timers[:] = [(c, ms) for c, ms in _timers if c != callback]


def script_log(level, text):
    _log.append((level, text))


# ---- test helpers (not part of obspython)

def _click(props, name):
    """Click a button; whether OBS would then refresh the properties (`py_ret == Py_True` there:
    only exactly True does, not 1 or any other true value)."""
    prop = props.items[name]
    return prop.details["callback"](props, prop) is True


def _change_scene(name):
    _current_scene[0] = name
    for callback in list(_callbacks):
        callback(OBS_FRONTEND_EVENT_SCENE_CHANGED)


def _reset():
    _callbacks.clear(), _timers.clear(), _log.clear()
    _current_scene[0] = None


standin = types.SimpleNamespace(click=_click, change_scene=_change_scene, reset=_reset, log=_log, timers=_timers,
                                run_timers=lambda: [callback() for callback, _ in list(_timers)],
                                callbacks=_callbacks)
