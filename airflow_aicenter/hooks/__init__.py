from airflow_aicenter.hooks.aicenter import AICenterHook

__all__ = ["AICenterHook"]
