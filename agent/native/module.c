/* agent.native._native: the Chain, Pump and Opener types, and accept.c's
 * original_dst() (see native.h). */
#include "native.h"

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.native._native",
    "The native data plane: the store's append point, the relay threads, and "
    "accepting redirected connections, opening in C what Python has judged before.", -1,
    accept_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ChainType) < 0 || PyType_Ready(&PumpType) < 0
        || PyType_Ready(&OpenerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ChainType);
    Py_INCREF(&PumpType);
    Py_INCREF(&OpenerType);
    if (PyModule_AddObject(m, "Chain", (PyObject *)&ChainType) < 0
        || PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0
        || PyModule_AddObject(m, "Opener", (PyObject *)&OpenerType) < 0
        || PyModule_AddIntConstant(m, "APPEND_MANY_MAX", TG_MANY_MAX) < 0
        || PyModule_AddStringConstant(m, "KERNEL_PROBE", TG_KERNEL_PROBE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
