"""The one job engine: every long piece of work (an index build, a compaction, a workflow) is a job.

    kinds.py        the registry: each job kind declares its steps (the first one starts it), their queue, and
                    for single-step workflows the module whose `run` registers the runner
    state.py        job rows: creation (limits), transitions, progress, cancellation, listing
    dispatch.py     how a step reaches a worker: the Dispatcher protocol, inline (tests, scripts) and Celery
    celery_app.py   the Celery application (broker from the settings, no result backend)
    readiness.py    what /readyz asks: the database, the broker, a live worker
    context.py      what a step gets besides ids: settings, database, model cache, dispatcher, device
    model_cache.py  the models a process keeps loaded
    run.py          single-step workflow jobs: JobRun, run_job (lock, claim, outcome), artifacts
    index_build.py  the index build's steps (plan, chunk, finalize) and the compaction
    steps.py        the worker side: step name -> function, one step run with its failure recorded, inline runs

Imports go one way: the API side (routes, services) uses kinds, state, dispatch and readiness, which import no
torch; the worker side (steps, run, index_build) imports the library. worker/ is Celery's entry point over steps.
"""
