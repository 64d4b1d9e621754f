"""The command-line tools, installed as console scripts (``pip install .``) and wrapped by the
repository's ``tools/*.py`` (``python tools/train_net.py ...`` from a source checkout)::

    console script        module (``main``)                           source-checkout wrapper
    --------------------  ------------------------------------------  -----------------------------------
    instseg-train         instseg.tools.train_net                     tools/train_net.py
    instseg-eval          instseg.tools.eval_net                      tools/eval_net.py
    instseg-benchmark     instseg.tools.benchmark_fps                 tools/benchmark_fps.py
    instseg-quickstart    instseg.tools.quickstart                    tools/quickstart.py
    instseg-convert       instseg.tools.convert_official_weights      tools/convert_official_weights.py
    instseg-demo          instseg.tools.demo                          tools/demo.py

Each module's ``main(argv=None)`` parses the arguments (``sys.argv[1:]`` by default) and returns
the exit status 0 (a console script passes it to ``sys.exit``); ``run(argv)`` returns the results
instead. Heavy imports (Lightning, the models) happen after parsing, so ``--help`` is quick.
"""
