-- Argo CD custom health check for pgrecovery.dev/PgRecovery.
-- Install it in argocd-cm as `resource.customizations.health.pgrecovery.dev_PgRecovery`.
-- Mapping (decided): Rejoined + Succeeded = Healthy; DryRunComplete = Healthy with the report;
-- Blocked awaiting `spec.confirm` = Suspended (a person must act); Blocked by another recovery
-- of the same deployment = Progressing (it proceeds by itself); Failed = Degraded; every
-- working phase = Progressing (Degraded-free even when Stalled: the Stalled alert pages).
local hs = {}

local function condition(obj, kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message_of(obj, fallback)
  if obj.status ~= nil and obj.status.message ~= nil and obj.status.message ~= "" then
    return obj.status.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil or obj.status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the recovery"
  return hs
end

local phase = obj.status.phase
local failed = condition(obj, "Failed")
local succeeded = condition(obj, "Succeeded")
local blocked = condition(obj, "Blocked")
local stalled = condition(obj, "Stalled")

if phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  local reason = obj.status.failureReason or (failed and failed.reason) or "Failed"
  hs.message = reason .. ": " .. message_of(obj, "the recovery failed")
  return hs
end

if succeeded ~= nil and succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(obj, "Recovery succeeded")
  return hs
end

if blocked ~= nil and blocked.status == "True" then
  if blocked.reason == "DryRunComplete" then
    hs.status = "Healthy"
    hs.message = "Dry run complete: " .. message_of(obj, blocked.message or "every check passed")
    return hs
  end
  if blocked.reason == "AwaitingConfirmation" then
    hs.status = "Suspended"
    hs.message = blocked.message or "Set spec.confirm to the target deployment to continue"
    return hs
  end
  hs.status = "Progressing"
  hs.message = (blocked.reason or "Blocked") .. ": " .. (blocked.message or "waiting")
  return hs
end

hs.status = "Progressing"
local text = phase .. ": " .. message_of(obj, "working")
if stalled ~= nil and stalled.status == "True" then
  text = "STALLED in " .. text
end
hs.message = text
return hs
