"""The agent layer: Lagent models on puyu, a sandboxed Python interpreter, and data-analysis runs.

Needs the `agent` extra (Lagent 0.2.4); `puyu.agent.sandbox` alone uses only the standard library.
Main entry points: `puyu.agent.runner.run_analysis`, `puyu.agent.batch.run_batch`, `puyu.agent.sandbox.Sandbox`,
`puyu.agent.models.EngineModel` / `OpenAIServerModel`, `puyu.agent.agent.PuyuAgent`.
"""
