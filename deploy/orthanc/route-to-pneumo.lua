-- Orthanc, the stand-in PACS, forwards chest radiographs to the pneumo DICOM node as they are
-- stored, and keeps the structured reports the node sends back (same study, new series).
--
-- Routed: Modality CR or DX whose BodyPartExamined is CHEST, THORAX, LUNG, CHEST_LAT or absent:
-- the same set the worker's filter accepts (worker/filters.py), because many CR/DX devices leave
-- the body part empty. The node filters again (SOP class, view, pixels) and records a reason for
-- whatever it does not classify, so this is a coarse filter that keeps hips and CTs at home.
-- Never routed: anything the node itself stored (a DICOM C-STORE whose calling AE title is the
-- node's) and any SR, so a report never loops back to the node.
--
-- Configuration: the destination is the DicomModalities entry named "pneumo" in orthanc.json
-- (its AE title, host and port come from PNEUMO_NODE_AET/_HOST/_PORT); PNEUMO_NODE_AET, read
-- here too, names the AE title whose stores are the node's.
--
-- Each send is an asynchronous Orthanc job (POST /modalities/pneumo/store) rather than Lua's
-- SendToModality(), whose failures are only logged: with the node down (a deploy, a restart) the
-- job ends in state Failure, is listed under /jobs and in Orthanc Explorer, and is sent again with
-- POST /jobs/{id}/resubmit. The node acknowledges a re-sent instance without classifying it twice.

local NODE_MODALITY = "pneumo"
local NODE_AET = os.getenv("PNEUMO_NODE_AET") or "PNEUMO"
local RADIOGRAPH_MODALITIES = { CR = true, DX = true }
local CHEST_BODY_PARTS = { [""] = true, CHEST = true, THORAX = true, LUNG = true, CHEST_LAT = true }

local function normalised(value)
  if type(value) ~= "string" then
    return ""
  end
  return string.upper((string.gsub(value, "^%s*(.-)%s*$", "%1")))
end

-- Why an instance stays in Orthanc, or nil when it goes to the node.
function PneumoSkipReason(tags, origin)
  if origin ~= nil and origin["RequestOrigin"] == "DicomProtocol"
      and normalised(origin["RemoteAet"]) == normalised(NODE_AET) then
    return "stored by the node " .. NODE_AET
  end
  local modality = normalised(tags["Modality"])
  if modality == "SR" then
    return "a structured report"
  end
  if not RADIOGRAPH_MODALITIES[modality] then
    return "modality " .. (modality ~= "" and modality or "absent")
  end
  local body_part = normalised(tags["BodyPartExamined"])
  if not CHEST_BODY_PARTS[body_part] then
    return "body part " .. body_part
  end
  return nil
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local reason = PneumoSkipReason(tags, origin)
  if reason ~= nil then
    print("pneumo routing: kept " .. instanceId .. " (" .. reason .. ")")
    return
  end
  local request = { Resources = { instanceId }, Asynchronous = true, Permissive = false }
  local job = ParseJson(RestApiPost("/modalities/" .. NODE_MODALITY .. "/store", DumpJson(request, true)))
  print("pneumo routing: sending " .. instanceId .. " to " .. NODE_MODALITY .. " (job " .. job["ID"] .. ")")
end
