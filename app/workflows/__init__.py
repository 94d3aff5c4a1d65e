"""The paper's workflows, one folder each: audit, report (the layer report), check (a data batch), experiment.

    <workflow>/routes.py    the HTTP layer: parse, call the service, shape the answer
    <workflow>/schemas.py   the request and response bodies
    <workflow>/service.py   the API side: validate, record the job, read its results (no model, no scoring)
    <workflow>/runner.py    the worker side: the job's runner, registered with app.jobs.run.job_runner

Each workflow is a job kind (app/jobs/kinds.py names its runner module); its job row is the resource, and
routes.py's list and delete routes come from the one factory in app/workflows/resources.py.
"""
