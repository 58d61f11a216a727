"""Evaluation sets for the Assistant Axis: persona jailbreaks, capability checks and drift conversations.

Activation capping is only worth using if it lowers harmful compliance under persona pressure (the jailbreak set,
classified by a judge with the nine-way rubric) without making the model worse at ordinary work (the capability set,
graded by exact answers so no judge is needed). Drift is measured on scripted multi-turn conversations in four
domains, optionally continued by a simulated user.

The packaged sets load by default; every loader also takes a user file of the same shape. Every problem with a file
is reported as one `PersonaxisError` line naming the file and the field.

- `jailbreaks`: the persona jailbreak set and its judge rubric;
- `capability`: the exact-answer capability set and its grader;
- `conversations`: the drift conversations and the simulated user;
- `common`: the shared models, field types and loader.
"""
