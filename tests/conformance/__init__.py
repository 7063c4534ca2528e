"""llama.cpp's own server tests, run straight at llama-server and through vcache (`make
conformance`, scripts/conformance.py): the stand-in server binary, the suite's pytest plugin
and the list of tests skipped with a reason."""
