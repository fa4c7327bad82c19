"""Wire formats: requests decoded into the core's queries, answers encoded back (the JSON
API's schemas, the Open Inference Protocol's tensors, image files, input conventions)."""
